import sys

from nicpassd.start import main

sys.exit(main())
