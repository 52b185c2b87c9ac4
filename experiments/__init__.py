"""The user's binaries (train, sweep, plot, study) and what they share (common); configs/ beside.

A package so that the binaries, the tests and a notebook import one another as
``experiments.<module>``; each binary still runs as ``python experiments/<binary>.py``.
"""
