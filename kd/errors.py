"""The one base class for errors caused by the user's input (config, data, model paths, cluster size).

The CLI prints these as a single line and exits with code 2; anything else is a bug and keeps its
traceback.
"""


class UserInputError(ValueError):
    """Bad input; the message is one line naming the file/row/field or the dotted config key."""
