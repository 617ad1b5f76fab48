"""`python -m pyfast` runs the main demo (every compression workflow on the digits
data); `python -m pyfast mlp` the kernel-latency demo on a transformer-style MLP;
`python -m pyfast backends` prints what runs where."""
import argparse
import sys


def main(argv) -> int:
    if argv[:1] == ["backends"]:
        argparse.ArgumentParser(prog="python -m pyfast backends",
                                description="Print which backend runs each op on this "
                                            "machine.").parse_args(argv[1:])
        import pyfast

        print(pyfast.backends())
        return 0
    if argv[:1] == ["mlp"]:
        from pyfast.demo_mlp import main as mlp_main

        return mlp_main(argv[1:])
    from pyfast.demo import main as demo_main

    return demo_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
