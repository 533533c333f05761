"""What comes in and goes out as data: NIfTI volumes and PNG slices with their geometry, the checks
an input must pass, users' datasets (BraTS, LiTS) recognised by name, and the QA table."""
