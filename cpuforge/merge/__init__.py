"""Adapters into their base: the plan checked from headers, the streamed merge, and adapters applied at run time instead."""
