import sys

from nicpassd.daemon import main

sys.exit(main())
