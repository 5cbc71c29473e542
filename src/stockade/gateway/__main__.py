import sys

from stockade.gateway.process import main

sys.exit(main())
