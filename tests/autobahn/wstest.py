# Runs autobahntestsuite's wstest from a `pip install --target` directory
# (the first argument): its namespace packages need the directory's .pth
# files, which only site.addsitedir reads.
import site
import sys

site.addsitedir(sys.argv.pop(1))
from autobahntestsuite.wstest import run  # noqa: E402

run()
