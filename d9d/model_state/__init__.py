"""Model state: declarative state-dict transforms (mappers) and checkpoint I/O."""
