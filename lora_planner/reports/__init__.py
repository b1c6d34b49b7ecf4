"""Markdown documents built from plans (capacity) and from measurement records (validation).

pandas and matplotlib are imported inside the functions that use them: the plain planning path
never loads them.
"""
