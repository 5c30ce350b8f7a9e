"""Using a tuned run: chat and generate (the library part is ``generation``)."""
