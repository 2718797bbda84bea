"""`python -m demo`: the embedded CFG vs SoftCFG demo (see demo/run.py)."""
from demo.run import main

if __name__ == "__main__":
    main()
