import sys

from clip.cli import main

sys.exit(main())
