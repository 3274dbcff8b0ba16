"""Allow ``python -m relate_smtp``."""

from relate_smtp.cli import main

raise SystemExit(main())
