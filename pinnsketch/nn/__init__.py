"""pinnsketch.nn."""
