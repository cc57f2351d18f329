"""python -m nanod"""
import sys

from nanod.cli import main

sys.exit(main())
