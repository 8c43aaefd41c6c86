"""Word pools the generators draw from; every entry is a plain lowercase ASCII word."""

PEOPLE = (
    "Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Leo", "Nora",
    "Max", "Zoe", "Paul", "Ella", "Omar", "Ruth", "Ivan", "Lucy", "Noah", "Sara",
)

# Countable things for word problems, plural form.
ITEMS = (
    "apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "cards",
    "eggs", "coins", "shells", "flowers", "candies", "toys", "balls", "beads",
)

# Keys of the recall task: distinct nouns, so that a prompt can hold up to 40 facts.
KEYS = (
    "falcon", "tiger", "otter", "badger", "heron", "panda", "lizard", "beaver", "camel", "cobra",
    "crane", "dolphin", "eagle", "ferret", "gecko", "hamster", "ibis", "jackal", "koala", "lemur",
    "llama", "moose", "newt", "ocelot", "parrot", "quail", "rabbit", "salmon", "toucan", "turtle",
    "viper", "walrus", "yak", "zebra", "bison", "raven", "shark", "sloth", "whale", "wolf",
    "anchor", "barrel", "candle", "basket", "button", "castle", "compass", "lantern", "ladder", "mirror",
    "needle", "pillow", "rocket", "saddle", "tunnel", "violin", "wagon", "helmet", "kettle", "hammer",
    "garden", "harbor", "island", "meadow", "valley", "canyon", "forest", "desert", "glacier", "river",
    "copper", "silver", "marble", "granite", "amber", "cobalt", "velvet", "cotton", "maple", "cedar",
)

# Words to sort and to count: short, common, all different first two letters.
LIST_WORDS = (
    "apple", "bread", "cloud", "drum", "engine", "fish", "grape", "house", "ink", "jelly",
    "kite", "lamp", "moon", "nest", "orange", "piano", "queen", "rose", "sun", "tree",
    "umbrella", "vase", "water", "yarn", "zoo", "bell", "chair", "door", "egg", "frog",
    "goat", "hat", "iron", "juice", "knot", "leaf", "milk", "nut", "owl", "pen",
)
