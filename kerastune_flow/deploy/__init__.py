"""A trained model at work: evaluation and prediction, the analysis of its mistakes, export and the artifacts that
go with it."""
