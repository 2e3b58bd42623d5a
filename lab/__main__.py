import sys

from lab.zfslab import main

sys.exit(main())
