"""Built-in generated data sets (planted preferences) for tests, demos and sanity checks."""

from acfrec.datasets.planted import PlantedData, PlantedTruth, planted_interactions

__all__ = ["PlantedData", "PlantedTruth", "planted_interactions"]
