"""The test suite is a package: helpers import as ``tests.<dir>.<module>`` from the repository root
(pytest puts it on ``sys.path``; subprocesses get it through ``PYTHONPATH``), with no path edits."""
