"""`python -m tfx.export FORMAT ...`: the command line of `tfx.export.ctranslate2`."""
from tfx.export.ctranslate2 import main

if __name__ == "__main__":  # importing it (as pkgutil.walk_packages does) runs nothing.
    main()
