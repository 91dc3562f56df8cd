"""Pipeline components: loading (hub id, local folder, builtin) and the tiny test models."""
