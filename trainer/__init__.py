"""HAMburger trainer: model, training, export and evaluation."""
