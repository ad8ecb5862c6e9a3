"""`score_distributed.py` on packed rows (run by test_packing_cleaning.py under 1 and 2 processes)."""

import sys

from score_distributed import end_launched_process, main  # the script's own folder is first on sys.path

if __name__ == "__main__":
    main(*sys.argv[1:5], packed=True)
    end_launched_process()
