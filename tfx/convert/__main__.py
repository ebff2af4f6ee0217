"""`python -m tfx.convert FORMAT ...`: imports another toolkit's model as a tfx run (marian)."""
import sys

FORMATS = ("marian",)

if __name__ == "__main__":  # importing it (as pkgutil.walk_packages does) runs nothing.
    if len(sys.argv) < 2 or sys.argv[1] not in FORMATS:
        sys.exit(f"tfx.convert: give the format first: python -m tfx.convert {{{','.join(FORMATS)}}} ...")
    sys.argv.pop(1)
    from tfx.convert.marian import main

    main()
