"""The command line's parsers; `run.py` runs the commands and is the only module that prints.

    parser.py          the parser of every command, one function each, and the examples in `--help`
    flags.py           the config flags, generated from the config's fields; a flag's former name, hidden
    model_commands.py  the flags of the commands that take a saved model: evaluate, predict and export

A setting's flag is written once, in `config.setting`; these modules only read it.
"""
