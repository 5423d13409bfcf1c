"""pinnsketch: physics-informed neural networks trained with sketched activation storage."""

__version__ = "0.1.0"
