"""Importers: a checkpoint or preset in, a split bundle out (`cosmoe-export split`)."""
