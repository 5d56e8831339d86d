"""Worker files in the form of the platform's 2024 `lib/` (aiohttp), written for the tests:
each uses that form's constructs as worker files in the wild do, with the imports changed to
`from pyworker import ...` and nothing else. tests/test_compat_2024.py runs them as processes
(`python -m workers_2024.<name>.server`) against fake model servers and a local autoscaler.
"""
