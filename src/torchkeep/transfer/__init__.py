"""Data movement: the save and load pipelines between tensors and storage.

Writers (:mod:`.writer`, :mod:`.direct_writer`, :mod:`.stream`) and readers (:mod:`.reader`,
:mod:`.parallel_read`) move bytes between tensor memory and files, using :mod:`torchkeep.format`
for the encoding and :mod:`torchkeep.storage` for durable, atomic files. :mod:`.pool` is the
shared I/O thread pool, :mod:`.memcopy` the snapshot copy, :mod:`.asyncsave` the one save path
(synchronous saves are asynchronous ones waited for), :mod:`.gcpause` keeps the garbage
collector out of hot loops.
"""
