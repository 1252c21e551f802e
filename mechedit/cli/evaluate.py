def register(sub, parents):
    pass
