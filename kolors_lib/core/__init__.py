"""The shared core: configuration, checked inputs, files written atomically, one error root, the console.
Also the device plan (which model sits where, in which dtype) and the ModelScope hub's address; no step lives here."""
