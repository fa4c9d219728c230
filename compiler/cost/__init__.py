"""The analytical cost model: hardware table, pricing of compiled modules, automatic layout
choice, and the tables of ``einshard explain``. Never imports JAX (only ``runtime/`` does)."""
