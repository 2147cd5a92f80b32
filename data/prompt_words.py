"""Word lists for the prompt generator, written for this project (no prompt dataset is copied).

Nouns are (singular, plural) pairs so counting prompts never need guessed plurals.
"""
from __future__ import annotations

ANIMALS = [("cat", "cats"), ("dog", "dogs"), ("fox", "foxes"), ("horse", "horses"), ("rabbit", "rabbits"),
           ("owl", "owls"), ("deer", "deer"), ("sheep", "sheep"), ("goose", "geese"), ("mouse", "mice"),
           ("butterfly", "butterflies"), ("elephant", "elephants"), ("giraffe", "giraffes"), ("penguin", "penguins"),
           ("hedgehog", "hedgehogs"), ("parrot", "parrots"), ("turtle", "turtles"), ("bear", "bears"),
           ("squirrel", "squirrels"), ("frog", "frogs"), ("koala", "koalas"), ("zebra", "zebras"), ("swan", "swans"),
           ("octopus", "octopuses"), ("lion", "lions"), ("red panda", "red pandas"), ("whale", "whales"),
           ("hummingbird", "hummingbirds"), ("goldfish", "goldfish"), ("wolf", "wolves"), ("camel", "camels"),
           ("corgi", "corgis"), ("raccoon", "raccoons"), ("flamingo", "flamingos"), ("tiger", "tigers")]
PEOPLE = [("woman", "women"), ("man", "men"), ("child", "children"), ("old fisherman", "old fishermen"),
          ("young dancer", "young dancers"), ("chef", "chefs"), ("astronaut", "astronauts"), ("knight", "knights"),
          ("street musician", "street musicians"), ("gardener", "gardeners"), ("scientist", "scientists"),
          ("painter", "painters"), ("skateboarder", "skateboarders"), ("grandmother", "grandmothers"),
          ("firefighter", "firefighters"), ("surfer", "surfers"), ("librarian", "librarians"),
          ("mountain climber", "mountain climbers"), ("baker", "bakers"), ("wizard", "wizards")]
OBJECTS = [("teapot", "teapots"), ("bicycle", "bicycles"), ("lantern", "lanterns"), ("umbrella", "umbrellas"),
           ("clock", "clocks"), ("book", "books"), ("chair", "chairs"), ("guitar", "guitars"), ("vase", "vases"),
           ("backpack", "backpacks"), ("camera", "cameras"), ("mug", "mugs"), ("candle", "candles"),
           ("suitcase", "suitcases"), ("hat", "hats"), ("kite", "kites"), ("lamp", "lamps"), ("violin", "violins"),
           ("typewriter", "typewriters"), ("globe", "globes"), ("key", "keys"), ("pocket watch", "pocket watches"),
           ("telescope", "telescopes"), ("rubber duck", "rubber ducks"), ("paper boat", "paper boats"),
           ("skateboard", "skateboards"), ("bench", "benches"), ("trophy", "trophies"), ("balloon", "balloons"),
           ("robot", "robots"), ("sneaker", "sneakers"), ("laptop", "laptops"), ("bottle", "bottles"),
           ("toy train", "toy trains"), ("birdhouse", "birdhouses"), ("chess piece", "chess pieces")]
VEHICLES = [("car", "cars"), ("bus", "buses"), ("sailboat", "sailboats"), ("train", "trains"),
            ("motorcycle", "motorcycles"), ("hot air balloon", "hot air balloons"), ("tractor", "tractors"),
            ("vintage truck", "vintage trucks"), ("canoe", "canoes"), ("airplane", "airplanes"),
            ("submarine", "submarines"), ("tram", "trams"), ("scooter", "scooters"), ("rowboat", "rowboats")]
FOODS = [("apple", "apples"), ("cupcake", "cupcakes"), ("bowl of ramen", "bowls of ramen"),
         ("croissant", "croissants"), ("strawberry", "strawberries"), ("slice of pizza", "slices of pizza"),
         ("lemon", "lemons"), ("donut", "donuts"), ("pear", "pears"), ("stack of pancakes", "stacks of pancakes"),
         ("watermelon", "watermelons"), ("cup of coffee", "cups of coffee"), ("macaron", "macarons"),
         ("taco", "tacos"), ("loaf of bread", "loaves of bread"), ("cherry", "cherries"), ("sushi roll", "sushi rolls"),
         ("pumpkin", "pumpkins"), ("banana", "bananas"), ("ice cream cone", "ice cream cones")]
BUILDINGS = [("lighthouse", "lighthouses"), ("cottage", "cottages"), ("castle", "castles"),
             ("skyscraper", "skyscrapers"), ("windmill", "windmills"), ("temple", "temples"), ("barn", "barns"),
             ("treehouse", "treehouses"), ("greenhouse", "greenhouses"), ("bridge", "bridges"),
             ("clock tower", "clock towers"), ("houseboat", "houseboats"), ("observatory", "observatories"),
             ("train station", "train stations"), ("bookshop", "bookshops"), ("cabin", "cabins")]
PLANTS = [("sunflower", "sunflowers"), ("cactus", "cacti"), ("oak tree", "oak trees"), ("bonsai tree", "bonsai trees"),
          ("rose", "roses"), ("tulip", "tulips"), ("fern", "ferns"), ("palm tree", "palm trees"),
          ("mushroom", "mushrooms"), ("cherry tree", "cherry trees"), ("lily", "lilies"), ("pine tree", "pine trees")]

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "golden",
          "silver", "teal", "turquoise", "crimson", "navy blue", "lavender", "mint green", "emerald"]
MATERIALS = ["wooden", "glass", "ceramic", "metal", "paper", "knitted", "marble", "porcelain", "bronze", "copper",
             "felt", "crystal", "origami", "leather", "stone", "wicker"]
QUALITIES = ["tiny", "huge", "old", "shiny", "fluffy", "rusty", "vintage", "ornate", "battered", "gleaming",
             "weathered", "elegant", "miniature", "colorful", "cozy", "futuristic", "handmade", "sleepy", "curious"]

ACTIONS = ["sleeping", "running", "reading a book", "jumping", "sitting quietly", "looking out of a window",
           "playing in the snow", "eating breakfast", "dancing", "walking through puddles", "wearing a scarf",
           "holding an umbrella", "looking at the stars", "riding a bicycle", "splashing in the water",
           "peeking from behind a tree", "carrying a basket of flowers", "sitting on a stack of books"]
SCENES = ["on a beach at sunset", "in a misty forest", "on a busy city street", "in a cozy kitchen",
          "on a snowy mountain peak", "in a field of wildflowers", "underwater near a coral reef",
          "in a neon-lit alley", "on a wooden table", "in the middle of a desert", "in an old library",
          "on the surface of the moon", "in a sunlit meadow", "beside a quiet lake", "in a rainy train station",
          "on a rooftop garden", "inside a greenhouse", "at a night market", "in a bamboo grove",
          "on a frozen pond", "in an autumn park", "at the edge of a cliff", "in a candlelit cathedral",
          "on a sandy riverbank", "in a cluttered workshop", "among floating islands in the sky",
          "in a tiled bathroom", "on a windowsill", "in a lavender field", "at a crowded harbor"]
SURFACES = ["a wooden table", "a marble countertop", "a linen tablecloth", "a stone ledge", "a stack of old books",
            "a windowsill", "a picnic blanket", "a glass shelf", "a mossy rock", "a velvet cushion"]
STYLES = ["a photograph", "a macro photograph", "an oil painting", "a watercolor painting", "a pencil sketch",
          "a 3D render", "pixel art", "a children's book illustration", "a studio photograph", "a claymation still",
          "a low-poly render", "an isometric illustration", "a vintage postcard", "a comic book panel",
          "a charcoal drawing", "digital art", "a linocut print", "a stained glass window", "a pastel drawing",
          "a film photograph", "a papercut collage", "a gouache painting", "a cinematic still", "a woodblock print"]
LIGHTING = ["golden hour light", "soft diffused light", "dramatic rim lighting", "a warm neon glow", "candlelight",
            "overcast daylight", "pale moonlight", "backlit by the setting sun", "bright studio lighting",
            "dappled sunlight through leaves", "the blue light of dusk", "harsh midday sun", "foggy morning light",
            "the glow of a campfire", "flickering lantern light"]
CAMERA = ["close-up", "wide-angle shot", "aerial view", "low-angle shot", "shallow depth of field",
          "symmetrical composition", "long exposure", "tilt-shift", "overhead shot", "35mm lens",
          "highly detailed", "minimalist composition"]
RELATIONS = ["to the left of", "to the right of", "above", "below", "next to", "in front of", "behind",
             "on top of"]
COUNTS = ["two", "three", "four", "five", "six"]
LANDSCAPES = ["a mountain valley", "a rocky coastline", "a desert canyon", "a rolling green countryside",
              "a frozen tundra", "a tropical lagoon", "a volcanic island", "a terraced rice field",
              "a birch forest", "a winding river", "an alpine lake", "a vast salt flat", "a fjord",
              "a field of sand dunes", "a quiet fishing village", "a city skyline"]
CONDITIONS = ["at sunrise", "at sunset", "under a starry sky", "after a thunderstorm", "in thick fog",
              "during a snowfall", "under the northern lights", "on a clear summer day", "in autumn colors",
              "at blue hour", "beneath a full moon", "in light rain"]
ATTIRE = ["wearing a red scarf", "in a yellow raincoat", "wearing round glasses", "in a flowing white dress",
          "wearing a straw hat", "in a leather jacket", "wearing a knitted sweater", "in a space suit",
          "with braided hair", "with paint on their hands", "wearing a flower crown", "in a tailored suit"]
