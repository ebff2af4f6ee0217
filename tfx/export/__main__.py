"""`python -m tfx.export FORMAT ...`: the command line of `tfx.export.ctranslate2`."""
from tfx.export.ctranslate2 import main

main()
