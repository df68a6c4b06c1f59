"""``python -m zrpc``: the zrpc command line, without needing the console script installed."""
from zrpc._cli.main import main

if __name__ == "__main__":
    main(prog_name="zrpc")
