"""The error a training command stops on when the user's input or files are wrong."""


class TrainingError(Exception):
    """A problem with the user's input or files, with a message that says what to do. Exit status 2."""
