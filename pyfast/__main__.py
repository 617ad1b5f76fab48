"""`python -m pyfast` runs the main demo (every compression workflow on the digits
data); `python -m pyfast mlp` the kernel-latency demo on a transformer-style MLP;
`python -m pyfast backends` prints what runs where."""
import sys

if sys.argv[1:2] == ["backends"]:
    import pyfast

    print(pyfast.backends())
elif sys.argv[1:2] == ["mlp"]:
    from pyfast.demo_mlp import main

    raise SystemExit(main(sys.argv[2:]))
else:
    from pyfast.demo import main

    raise SystemExit(main(sys.argv[1:]))
