"""``python -m torch_regularizers {demo,bench,inspect}``: see :mod:`torch_regularizers.cli`."""

from torch_regularizers.cli import main

raise SystemExit(main())
