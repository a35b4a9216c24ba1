"""`python -m morphkit ...` runs the `morphkit` command, so that `accelerate launch -m morphkit batch jobs.jsonl`
starts it in every process."""

import sys

from cli.main import main

if __name__ == "__main__":
    sys.exit(main())
