"""Everything that knows about ranks: process-group topology, the data-parallel engine, expert and context parallelism."""
