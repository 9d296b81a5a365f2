"""Searching over approaches and settings: tune (the tuner, its space, its report) and compare."""
