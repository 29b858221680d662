"""``python -m gradfence`` runs the command-line interface."""

from gradfence.cli import main

raise SystemExit(main())
