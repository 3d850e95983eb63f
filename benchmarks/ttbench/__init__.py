"""ttbench: the trainable-tokens benchmark as importable parts.

* ``shapes``: the shape syntax, the random frozen base model, the input ids.
* ``setups``: the registry of setups (``floor``, ``tt``, ``peft``, ``full``), each
  a function that turns a model tree sharing the base weights into a :class:`Setup`;
  the train step every setup is timed on.
* ``measure``: timing in alternating rounds, allocator and RSS memory, the
  profiler, checkpoint bytes, and :func:`measure.bench_shape`, which runs all of
  them on one shape for any registered setups.
* ``report``: the tables, the ratios and the JSON summary.
* ``cli``: the command line (``benchmarks/bench_trainable_tokens.py``).
* ``device``: ``--device``/``--dtype``, synchronised timing and peak memory on cuda.
* ``per_sample``: mixed batches (``adapter_names=``) over 1, 8 and 64 adapters
  (``python -m ttbench.per_sample``).
* ``decode``: greedy decode, eager against ``torch.compile``, base model and one
  adapter (``python -m ttbench.decode``).

A new setup is one function registered with :func:`setups.register_setup`;
``--setups NAME`` then runs it beside the floor, and the tables add its columns.
"""
