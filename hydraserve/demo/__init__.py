"""The embedded default: everything on one machine (`hydraserve demo` / `hydraserve up`)."""
