"""The veRL plugin: ``import verl`` loads it (entry point ``verl.plugins`` -> ``ragen_archer``)."""
