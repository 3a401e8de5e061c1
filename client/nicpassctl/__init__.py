__version__ = "0.1.0"  # = nicpassd.__version__ (checked by tests/unit/test_cli_parser.py)
