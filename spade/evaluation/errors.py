"""The error the evaluator raises for bad input (a file, a field or a flag a user handed it)."""


class EvaluationInputError(ValueError):
    """Bad evaluation input; the message is one line naming the file, the image id and the field.

    The command line prints it without a traceback and exits with status 2.
    """
