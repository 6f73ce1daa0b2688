"""`python -m kdcache` runs the command line."""

from kdcache.cli import main

main()
