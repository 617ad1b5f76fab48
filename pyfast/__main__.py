"""`python -m pyfast` runs the demo; `python -m pyfast backends` prints the backend table."""
import sys

if sys.argv[1:2] == ["backends"]:
    import pyfast

    print(pyfast.backends())
else:
    from pyfast.demo import main

    raise SystemExit(main(sys.argv[1:]))
