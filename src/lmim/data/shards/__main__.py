"""``python -m lmim.data.shards write data.root=... out=...`` (see :mod:`lmim.data.shards`)."""

from lmim.data.shards import main

main()
