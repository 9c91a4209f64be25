"""The bundled model checkpoints (package data) and the scripts that train them and write their cards."""
