# transformers' test files hold mixins that tests/test_transformers_suite.py runs on ReplitLM; collected on their own
# they would run transformers' own tests of other models.
collect_ignore_glob = ["*.py", "*/*.py"]
