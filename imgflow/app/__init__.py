"""The application: the `imgflow` commands and what they start (the pipeline's processes,
a replay's stages, the embedded stack). It sits above everything it wires: nothing in
imgflow/ outside this package, nor consumers/, watchers/ or schemas/, imports it."""
